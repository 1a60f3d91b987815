"""SSML input and the pronunciation lexicon: parsing, limits, where pauses land in the audio.

Parsing and the lexicon are plain logic. Where the pauses land is measured in the real app (routes,
service layer, scheduler, stitcher, encoders) on the timed fake engine (tests/support/slow_engine.py),
whose every sentence is an exact 220 Hz tone, so silence and sound are told apart to the sample; the
embedded engine's real speech is checked in test_ssml_embedded.py.
"""
import base64
import io
import json
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import websocket
from werkzeug.serving import make_server

from service import lexicon, ssml
from service.audio import Stitcher
from service.settings import Settings

from .support.procs import PYTHON, REPO_ROOT, free_port
from .support.slow_engine import RATE, SlowEngine

LIMITS = ssml.Limits(max_break_s=10, max_total_break_s=20)


def parse(text: str, words=lambda s: s) -> ssml.Spoken:
    return ssml.parse(text, LIMITS, words)


# --- parsing ------------------------------------------------------------------------------------------

def test_breaks_split_the_text_into_pieces_with_their_pauses():
    spoken = parse('<speak>Hello <break time="1s"/> world. <break time="250ms"/>Bye.</speak>')
    assert [(p.text, p.pause_s) for p in spoken.pieces] == [("Hello", 1.0), ("world.", 0.25), ("Bye.", 0.0)]
    assert spoken.lead_s == 0 and spoken.pause_s == 1.25


def test_leading_breaks_in_a_row_and_strengths_add_up():
    spoken = parse('<speak><break time="0.5s"/>Hi<break strength="strong"/><break/>there<break strength="none"/>'
                   "</speak>")
    assert spoken.lead_s == 0.5
    assert [(p.text, p.pause_s) for p in spoken.pieces] == [("Hi", ssml.STRENGTH_S["strong"] + ssml.STRENGTH_S[
        "medium"]), ("there", 0.0)]


def test_declaration_namespace_paragraphs_sub_and_say_as():
    doc = ('<?xml version="1.0"?>\n<speak version="1.1" xmlns="http://www.w3.org/2001/10/synthesis" xml:lang="en-US">\n'
           "  <p><s>Read the <sub alias=\"World Wide Web\">WWW</sub> page.</s>\n  <s>Code <say-as interpret-as=\"characters\">"
           'ab1</say-as>, pin <say-as interpret-as="digits">907</say-as>,</s></p>\n  <p>total <say-as '
           'interpret-as="cardinal">1,234</say-as>, the <say-as interpret-as="ordinal">21</say-as> time &amp; '
           "&lt;done&gt;.</p>\n</speak>")
    (piece,) = parse(doc).pieces
    lines = [line.strip() for line in piece.text.split("\n") if line.strip()]
    # <s> and <p> are sentence ends (line breaks, where chunking always splits); layout whitespace is one space.
    assert lines == ["Read the World Wide Web page.", "Code A B 1, pin nine zero seven,",
                     "total one thousand two hundred thirty-four, the twenty-first time & <done>."]


def test_the_lexicon_applies_to_written_text_not_to_aliases_or_say_as():
    lex = lexicon.build([("www", "the web", "t"), ("ab", "XX", "t")])
    (piece,) = parse('<speak>www <sub alias="www">x</sub> <say-as interpret-as="characters">ab</say-as> ab</speak>',
                     lex.apply).pieces
    assert piece.text == "the web www A B XX"


@pytest.mark.parametrize("doc,code,words", [
    ("<speak>a & b</speak>", "invalid_ssml", ["line 1, column 11", "&amp;"]),
    ("<speak>one\n<s>two</speak>", "invalid_ssml", ["line 2, column 9", "mismatched tag"]),
    ('<speak><phoneme alphabet="ipa" ph="t">tomato</phoneme></speak>', "unsupported_ssml",
     ["<phoneme>", "supported: <speak>, <p>, <s>, <break>, <sub>, <say-as>"]),
    ('<speak><prosody rate="slow">x</prosody></speak>', "unsupported_ssml", ["<prosody>"]),
    ('<speak><say-as interpret-as="date">2024-01-01</say-as></speak>', "unsupported_ssml", ["date", "cardinal"]),
    ('<speak><say-as interpret-as="cardinal">twelve</say-as></speak>', "invalid_ssml", ["needs a number"]),
    ('<speak><break time="11s"/></speak>', "break_too_long", ["11 s", "SSML_MAX_BREAK_S"]),
    ('<speak>a<break time="9s"/>b<break time="9s"/>c<break time="3s"/></speak>', "break_too_long",
     ["20 s", "SSML_MAX_TOTAL_BREAK_S"]),
    ('<speak><break time="soon"/></speak>', "invalid_ssml", ['"500ms"']),
    ('<speak><break strength="huge"/></speak>', "invalid_ssml", ["x-strong"]),
    ('<speak><break time="1s" volume="loud"/></speak>', "unsupported_ssml", ["'volume'"]),
    ("<speak><sub>WWW</sub></speak>", "invalid_ssml", ["alias"]),
    ("<speak>hi<speak>again</speak></speak>", "invalid_ssml", ["root element only"]),
    ("<speak>" + "<s>" * 20 + "deep" + "</s>" * 20 + "</speak>", "invalid_ssml", ["16 deep"]),
    # Nothing may come before <speak> (but an XML declaration), so no DTD or entity declaration gets parsed.
    ('<!DOCTYPE speak [<!ENTITY lol "lol">]><speak>&lol;</speak>', "invalid_ssml", ["starts with <speak>"]),
    ("Hello <break/>", "invalid_ssml", ["starts with <speak>"]),
])
def test_bad_markup_is_refused_saying_what_to_fix(doc, code, words):
    with pytest.raises(ssml.SSMLError) as e:
        parse(doc)
    assert e.value.code == code
    for word in words:
        assert word in str(e.value)


def test_entity_declarations_are_refused_by_the_parser_itself():
    # is_ssml keeps a DTD from ever reaching the parser; defusedxml would refuse one as well.
    from defusedxml import DTDForbidden
    from defusedxml.ElementTree import fromstring

    with pytest.raises(DTDForbidden):
        fromstring('<!DOCTYPE speak [<!ENTITY a "b">]><speak>&a;</speak>', forbid_dtd=True)


# --- the lexicon ----------------------------------------------------------------------------------------

def test_lexicon_is_whole_word_longest_first_and_lower_case_entries_match_any_case(tmp_path):
    path = tmp_path / "lexicon.tsv"
    path.write_text("# comment\n\nnginx\tengine x\nUS\tUnited States\nNew York\tthe big apple\nnew\tfresh\n"
                    "C++\tC plus plus\n")
    lex = lexicon.load(path)
    assert len(lex) == 5
    assert lex.apply("NGINX and Nginx, not nginxes; US vs us") == \
        "engine x and engine x, not nginxes; United States vs us"
    assert lex.apply("New York is new. C++!") == "the big apple is fresh. C plus plus!"


def test_json_lexicon(tmp_path):
    path = tmp_path / "lexicon.json"
    path.write_text(json.dumps({"SQL": "sequel", "gif": "jif"}, indent=1))
    assert lexicon.load(path).apply("SQL, sql and GIF") == "sequel, sql and jif"


@pytest.mark.parametrize("name,content,where", [
    ("l.tsv", "ok\tfine\nbroken line without a tab\n", "line 2: expected `word<TAB>replacement`"),
    ("l.tsv", "a\tb\tc\n", "line 1: expected"),
    ("l.tsv", "a\t \n", "line 1: 'a' has an empty replacement"),
    ("l.tsv", "x\ty\nx\tz\n", "line 2: 'x' is listed twice"),
    ("l.json", '{\n "a": "b",\n "c": \n}', "line 4 column 1: not valid JSON"),
    ("l.json", '{\n "a": "b",\n "c": 3\n}', "line 3: the replacement of 'c' must be a string"),
    ("l.json", '{\n "a": "b",\n "a": "c"\n}', "line 2: 'a' is listed twice"),
    ("l.json", '["a", "b"]', "must hold one JSON object"),
])
def test_a_malformed_lexicon_names_the_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(lexicon.LexiconError, match=f"LEXICON_FILE {path}.*") as e:
        lexicon.load(path)
    assert where in str(e.value)


def test_a_malformed_lexicon_stops_the_worker_at_start(tmp_path):
    """One readable line from gunicorn's start (its config reads the settings), before anything loads."""
    path = tmp_path / "bad.tsv"
    path.write_text("fine\tok\nno tab here\n")
    env = {"LEXICON_FILE": str(path), "VOICES_DIR": str(tmp_path / "voices"), "BIND": f"127.0.0.1:{free_port()}",
           "PATH": "/usr/bin:/bin"}
    r = subprocess.run([PYTHON, "-m", "gunicorn", "-c", str(REPO_ROOT / "service/gunicorn.conf.py"),
                        "service.app:create_app()"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last == (f"voxbox: invalid settings: LEXICON_FILE {path} line 2: expected `word<TAB>replacement` (two "
                    "fields separated by one tab), got 1 field(s): 'no tab here'")


# --- the stitcher -----------------------------------------------------------------------------------------

def test_stitcher_puts_silence_before_and_after_sentences_instead_of_a_crossfade():
    stitcher = Stitcher(1000, crossfade_ms=10, pauses_s=(0.05, 0.1, 0.0, 0.02))
    ones = np.ones(100, dtype=np.float32)
    out = np.concatenate([stitcher.push(ones, False), stitcher.push(ones, True), stitcher.push(ones, True),
                          stitcher.push(ones, True), stitcher.flush()])
    # 50 silent, 200 sound (sentence 1 in full: no crossfade into a pause), 100 silent, then sentences 2 and 3
    # joined by a 10-sample crossfade (no pause between them), 20 silent at the end.
    assert out.size == 50 + 200 + 100 + 200 - 10 + 20
    assert not out[:50].any() and (out[50:250] == 1).all() and not out[250:350].any()
    assert (out[350:540] > 0.7).all() and not out[540:].any()
    # Captions: sentence 1 starts after the lead pause and ends where its audio does, 2 starts after the pause
    # and ends in the middle of its crossfade into 3, 3 ends where its audio does, before the closing pause.
    assert stitcher.starts == [50, 350, 445]
    assert stitcher.ends == [250, 445, 540]


# --- in the real app, on the timed fake engine --------------------------------------------------------------

TONE_S = 4 * 0.05  # SlowEngine(…, steps=4): every sentence is four 50 ms tone steps


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from service.app import create_app

    tmp = tmp_path_factory.mktemp("ssml-app")
    lex = tmp / "lexicon.tsv"
    lex.write_text("www\tthe web\n")
    app = create_app(Settings(voices_dir=tmp / "voices", lexicon_file=lex, ssml_max_break_s=3,
                              ssml_max_total_break_s=5, crossfade_ms=15), engine=SlowEngine(0.001, 4))
    ctx = app.extensions["voxbox"]
    deadline = time.monotonic() + 30
    while not ctx.scheduler.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctx.scheduler.ready
    yield app
    for runtime in ctx.models:
        runtime.scheduler.stop()


def runs(audio: np.ndarray, rate: int) -> list[tuple[str, float]]:
    """The audio as runs of sound and silence, in seconds (a 220 Hz tone crosses zero every ~100 samples,
    so silence is a run of exact zeros longer than 5 ms)."""
    silent = np.abs(audio) < 1e-4
    edges = np.flatnonzero(np.diff(silent.astype(np.int8))) + 1
    bounds = [0, *edges, audio.size]
    out: list[tuple[str, float]] = []
    for a, b in zip(bounds, bounds[1:]):
        seconds = (b - a) / rate
        kind = "silence" if silent[a] and seconds >= 0.005 else "sound"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + seconds)
        else:
            out.append((kind, seconds))
    return [(k, round(s, 3)) for k, s in out]


def test_plan_chunks_never_cross_a_break(app):
    svc = app.extensions["voxbox"].synthesis
    plan = svc.prepare('<speak><break time="200ms"/>First part. Still first.<break time="1s"/>Second www.'
                       "</speak>", "auto")
    assert plan.chunks == ["First part. Still first.", "Second the web."]
    assert plan.pauses == (0.2, 1.0, 0.0)
    assert plan.characters == len("First part. Still first.") + len("Second www.")  # written, not the lexicon's
    # Plain text goes through the lexicon too, and "text" never reads markup.
    assert svc.prepare("visit www now", "auto").chunks == ["visit the web now"]
    assert svc.prepare('<speak>hi<break time="1s"/></speak>', "auto", input_format="text").chunks == \
        ['<speak>hi<break time="1s"/></speak>']


def test_usage_counts_the_written_text_of_ssml_as_of_plain_text(app):
    """A client is charged what it wrote: not the lexicon's replacements, a <sub> alias or <say-as> words."""
    svc = app.extensions["voxbox"].synthesis
    written = "Call WWW at 1234 about www."
    plan = svc.prepare('<speak>\n  Call <sub alias="World Wide Web">WWW</sub> at <say-as interpret-as="cardinal">'
                       '1234</say-as>\n  about www.<break time="1s"/>\n</speak>', "auto")
    assert plan.chunks == ["Call World Wide Web at one thousand two hundred thirty-four about the web."]
    assert plan.characters == len(written) == svc.prepare(written, "auto").characters


def test_a_break_is_silence_at_its_place_in_tts_output(app):
    r = app.test_client().post("/tts", json={"text": '<speak>One.<break time="1s"/>Two.<break time="300ms"/>'
                                                     "Three.</speak>"})
    assert r.status_code == 200, r.get_data(as_text=True)
    audio, rate = sf.read(io.BytesIO(base64.b64decode(r.get_json()["audio_base64"])), dtype="float32")
    assert runs(audio, rate) == [("sound", TONE_S), ("silence", 1.0), ("sound", TONE_S), ("silence", 0.3),
                                 ("sound", TONE_S)]


@pytest.mark.parametrize("path", ["/tts", "/v1/audio/speech"])
def test_captions_are_shown_when_their_sentence_is_heard_not_during_the_pause_before_it(app, path):
    text = '<speak><break time="500ms"/>One.<break time="1s"/>Two.</speak>'
    if path == "/tts":
        body = app.test_client().post(path, json={"text": text, "timestamps": "sentence"}).get_json()
    else:
        events = app.test_client().post(path, json={"input": text, "timestamps": "sentence", "stream_format": "sse",
                                                    "response_format": "pcm"}).get_data(as_text=True)
        body = json.loads([e for e in events.split("\n\n") if e.strip()][-1][len("data: "):])
    captions = [(c["text"], c["start"], c["end"]) for c in body["captions"]]
    assert captions == [("One.", 0.5, pytest.approx(0.5 + TONE_S, abs=0.002)),
                        ("Two.", pytest.approx(1.5 + TONE_S, abs=0.002), pytest.approx(1.5 + 2 * TONE_S, abs=0.002))]


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
def test_a_break_is_silence_at_its_place_in_a_stream(app, fmt):
    r = app.test_client().post("/v1/audio/speech", json={
        "input": '<speak><break time="0.5s"/>One.<break time="1.5s"/>Two.</speak>', "response_format": fmt,
        "stream": True})
    assert r.status_code == 200, r.get_data(as_text=True)
    data = r.get_data()
    if fmt == "wav":
        data = data[44:]  # the streamed header (unknown length), then PCM
    audio = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
    assert runs(audio, RATE) == [("silence", 0.5), ("sound", TONE_S), ("silence", 1.5), ("sound", TONE_S)]


def test_input_format_ssml_and_text(app):
    client = app.test_client()
    r = client.post("/v1/audio/speech", json={"input": "plain words", "input_format": "ssml",
                                              "response_format": "pcm"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_ssml"
    r = client.post("/v1/audio/speech", json={"input": '<speak>x<break time="9s"/></speak>', "input_format": "text",
                                              "response_format": "pcm"})
    assert r.status_code == 200  # read as text: no pause asked for, so none over the limit


@pytest.mark.parametrize("text,code,status", [
    ('<speak>a<break time="4s"/>b</speak>', "break_too_long", 400),
    ('<speak>a<break time="3s"/>b<break time="3s"/>c</speak>', "break_too_long", 400),
    ('<speak><emphasis>a</emphasis></speak>', "unsupported_ssml", 400),
    ("<speak>a <b</speak>", "invalid_ssml", 400),
    ('<speak><break time="1s"/></speak>', "invalid_text", 400),
    ('<speak>...<break time="1s"/>!</speak>', "nothing_to_say", 400),
    (f'<speak><say-as interpret-as="cardinal">{"9" * 37}</say-as></speak>', "invalid_ssml", 400),
    (f'<speak><say-as interpret-as="ordinal">{"1" * 40}</say-as></speak>', "invalid_ssml", 400),
])
def test_refused_ssml_is_a_400_json_error_on_every_endpoint(app, text, code, status):
    client = app.test_client()
    for path, body in (("/tts", {"text": text}), ("/v1/audio/speech", {"input": text, "response_format": "pcm"})):
        r = client.post(path, json=body)
        assert r.status_code == status and r.get_json()["error"]["code"] == code, (path, r.get_data(as_text=True))


def test_a_break_is_silence_in_a_websocket_stream_and_its_duration(app):
    # A real client and server: the Flask test client cannot speak WebSocket.
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/v1/stream", timeout=30)
        ws.send(json.dumps({"text": '<speak>One.<break time="700ms"/>Two.</speak>', "sample_rate": RATE}))
        pcm, done = b"", None
        while done is None:
            msg = ws.recv()
            if isinstance(msg, bytes):
                pcm += msg
            elif json.loads(msg)["type"] in ("done", "error"):
                done = json.loads(msg)
        ws.close()
    finally:
        server.shutdown()
    assert done["type"] == "done", done
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767
    assert runs(audio, RATE) == [("sound", TONE_S), ("silence", 0.7), ("sound", TONE_S)]
    assert done["duration"] == pytest.approx(audio.size / RATE, abs=0.002)
