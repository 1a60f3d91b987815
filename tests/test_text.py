import pytest

from service.text import TextError, has_cjk, normalize, split_sentences


def test_normalize_collapses_whitespace_and_keeps_line_breaks():
    assert normalize("  Hello \t  world  \r\n\n  again ") == "Hello world\nagain"


@pytest.mark.parametrize("bad", ["", "   ", "\n\t \n"])
def test_normalize_rejects_empty(bad):
    with pytest.raises(TextError, match="empty"):
        normalize(bad)


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x1b", "\u202e"])
def test_normalize_rejects_control_characters_with_position(ch):
    with pytest.raises(TextError, match=r"U\+[0-9A-F]{4} at position 3"):
        normalize("abc" + ch + "def")


def test_normalize_is_nfc():
    assert normalize("e\u0301") == "\u00e9"


def test_split_english_sentences_keeps_punctuation():
    text = "First sentence here. Second one follows! Is this the third? Yes; it is."
    chunks = split_sentences(text, 40)
    assert chunks == ["First sentence here.", "Second one follows!", "Is this the third?", "Yes; it is."]


def test_split_chinese_sentences():
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？"
    assert split_sentences(text, 10) == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？"]


def test_short_sentences_are_merged_up_to_the_limit():
    chunks = split_sentences("Hi. Yes. Okay then, let us begin the long part of this text now.", 80)
    assert chunks[0].startswith("Hi. Yes.")
    assert all(len(c) <= 80 for c in chunks)


def test_long_sentence_is_split_at_clauses_then_words_under_the_limit():
    sentence = ("This sentence, which goes on and on, has many clauses, and it keeps going well beyond "
                "the limit that any engine would accept in one piece without complaint") * 3
    chunks = split_sentences(sentence, 50)
    assert all(0 < len(c) <= 50 for c in chunks)
    assert " ".join(chunks).split() == sentence.split()


def test_unbroken_chinese_is_hard_cut():
    chunks = split_sentences("字" * 95, 40)
    assert [len(c) for c in chunks] == [40, 40, 15]


def test_line_breaks_end_chunks():
    assert split_sentences("Title without period\nBody text.", 200) == ["Title without period Body text."] or \
        split_sentences("Title without period\nBody text.", 15) == ["Title without period", "Body text."]
    assert split_sentences("Title without period\nBody text.", 25) == ["Title without period", "Body text."]


def test_has_cjk():
    assert has_cjk("hello 世界") and not has_cjk("hello world")


def test_a_streams_first_chunk_is_short():
    from service.text import split_sentences

    text = ("Hello! This is VoxBox, a text to speech service running on your own machine. "
            "It speaks every sentence you give it.")
    # Without a limit the short greeting is merged into the next sentence.
    assert split_sentences(text, 200)[0].startswith("Hello! This is VoxBox")
    chunks = split_sentences(text, 200, first_max=40)
    assert chunks[0] == "Hello!" and " ".join(chunks) == text
    # A long first sentence: its first clause; with no comma in reach, whole words up to the limit.
    long = "The quick brown fox, which was very quick indeed, jumps over the lazy dog. Then it rests."
    chunks = split_sentences(long, 200, first_max=40)
    assert chunks[0] == "The quick brown fox," and " ".join(chunks) == long
    words = "Unbroken words keep on going well past any limit we set here today. Done."
    chunks = split_sentences(words, 200, first_max=40)
    assert chunks[0] == "Unbroken words keep on going well past" and len(chunks[0]) <= 40
    assert " ".join(chunks) == words
    # Short enough already, or no limit: unchanged.
    assert split_sentences("Short text.", 200, first_max=40) == ["Short text."]
    assert split_sentences(long, 200, first_max=0) == split_sentences(long, 200)
    # Chinese: the first sentence, cut at its clause mark.
    zh = "你好，欢迎使用语音合成服务，这是一段比较长的中文句子。第二句。"
    chunks = split_sentences(zh, 200, first_max=8)
    assert chunks[0] == "你好，" and "".join(chunks).replace(" ", "") == zh
