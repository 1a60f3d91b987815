"""VoxCPM2 through the `voxcpm` package (2.0.3): 48 kHz out, 30 languages, voice design and three ways to clone.

The VoxCPM-1.5 engine's loading, prompt caching, normalisation and generation loop serve it unchanged (the
package's VoxCPM2Model has the same prompt-cache generation API); what differs is here:

- clips are encoded at the AudioVAE V2's 16 kHz input rate (uploaded voices are stored at it);
- a voice conditions generation in one of three modes (CloneMode): as an isolated reference (any clip), as
  a continuation of the clip (needs its transcript), or both (the default when there is a transcript);
- `instructions` become the model's parenthesised control prefix (control.py) in the modes that read it:
  zero-shot (voice design), reference, reference + continuation. Continuation alone starts its text with the
  clip's transcript, where the model does not take a description as one, so it is refused there (check);
- voice carry (a chunk after the first): the reference stays (the voice's clip, or without a voice the
  previous chunk's tail itself) and the continuation is the previous chunk's tail and words, so every mode
  that reads instructions keeps reading them; a voice used in continuation alone wins over the carry, as
  on VoxCPM-1.5.

Requests are batched as VoxCPM-1.5's are (the engine's make_batch / batch_add; batch.py runs both families'
steps, family.py holds VoxCPM2's differences); TTS_MAX_BATCH=1 serves them through the package's own loop.
"""
from __future__ import annotations

from typing import Optional

from ...audio import resample
from ..base import CloneMode, Continuation, SynthesisParams, UnsupportedRequest, VoicePrompt
from .control import as_spoken, control_prefix
from .engine import VoxCPMEngine

# The model card's languages (openbmb/VoxCPM2): no language tag is given to the model, it reads the text.
LANGUAGES = ("ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "id", "it", "ja", "km", "ko", "lo", "ms",
             "my", "nl", "no", "pl", "pt", "ru", "sv", "sw", "th", "tl", "tr", "vi", "zh")
# The package's text normaliser (voxcpm.utils.text_normalize) has rules for these only.
NORMALIZED = ("en", "zh")

_REFERENCE, _CONTINUATION, _BOTH = CloneMode.REFERENCE.value, CloneMode.CONTINUATION.value, \
    CloneMode.REFERENCE_CONTINUATION.value


class VoxCPM2Engine(VoxCPMEngine):
    name = "voxcpm2"
    architecture = "voxcpm2"
    languages = LANGUAGES
    clone_modes = (_BOTH, _REFERENCE, _CONTINUATION)
    samples_per_token_before_load = 4 * 1920
    supports_instructions = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sample_rate, self.voice_sample_rate = 48000, 16000  # the AudioVAE V2's, until the load reads them

    def _normalize(self, text: str, lang: Optional[str] = None) -> str:
        """The package's normaliser for English and Chinese (it tells them apart itself when lang is auto);
        text in the other languages goes to the model as written."""
        if lang is not None and lang not in NORMALIZED:
            return text
        return super()._normalize(text, lang)

    def voice_modes(self, transcript: str) -> tuple[str, ...]:
        return self.clone_modes if transcript.strip() else (_REFERENCE,)

    def _mode(self, prompt: VoicePrompt, params: SynthesisParams) -> str:
        return params.clone_mode or prompt.modes[0]

    def check(self, prompt: Optional[VoicePrompt], params: SynthesisParams) -> None:
        if prompt is None:
            return
        mode = self._mode(prompt, params)
        if mode not in self.voice_modes(prompt.text):
            raise UnsupportedRequest("unsupported_clone_mode", f"voice '{prompt.voice_id}' has no transcript, so it "
                                     f"clones as a reference only; send clone_mode '{_REFERENCE}', or upload the "
                                     "clip again with its transcript (field 'text')")
        if params.instructions and mode == _CONTINUATION:
            raise UnsupportedRequest("instructions_not_supported", "VoxCPM2 does not follow instructions when it "
                                     f"continues a voice's clip (clone_mode '{_CONTINUATION}'); send clone_mode "
                                     f"'{_BOTH}' or '{_REFERENCE}' to keep the voice and apply them, or drop "
                                     "instructions")

    def _encode_prompt(self, prompt: VoicePrompt) -> dict:
        """The voice's clip as a reference (right-padded) and, with a transcript, as a continuation prompt
        (left-padded), both at the VAE's input rate; each request picks what its mode needs."""
        return self._encode_clip(self._read_clip(prompt.wav_path, self.voice_sample_rate), prompt.text)

    def _encode_clip(self, audio, text: str, reference: bool = True) -> dict:
        """Audio at the VAE's input rate as a reference (unless told not to) and, with its words, as a
        continuation prompt."""
        encoded = {"ref_audio_feat": self._latents(audio, self.voice_sample_rate, pad_left=False)} if reference else {}
        if text.strip():
            encoded["prompt_text"] = as_spoken(text)
            encoded["audio_feat"] = self._latents(audio, self.voice_sample_rate, pad_left=True)
        return encoded

    def _condition(self, text: str, prompt: Optional[VoicePrompt], params: SynthesisParams,
                   carry: Optional[Continuation] = None, normalize: bool = False) -> tuple[str, Optional[dict]]:
        """The control prefix goes in front of the first text of the sequence: the chunk itself, or (when
        a clip is continued) the words that precede it."""
        self.check(prompt, params)
        spoken, prefix = as_spoken(text), control_prefix(params.instructions)
        mode = None if prompt is None else self._mode(prompt, params)
        # The tail is encoded as what this chunk uses of it, no more (each encode holds up every row of a
        # batch): nothing when the voice's clip alone is continued, no reference beside the voice's own.
        carried = None if mode == _CONTINUATION else self._carry_text(carry, normalize, params.lang)
        tail = None if carried is None or not carried.strip() else self._encode_clip(
            resample(carry.audio, self.sample_rate, self.voice_sample_rate), carried, reference=prompt is None)
        if prompt is None:
            if tail is None:
                return prefix + spoken, None
            return spoken, {**tail, "mode": "ref_continuation", "prompt_text": prefix + tail["prompt_text"]}
        voice = self._prompt_cache(prompt)
        if tail is not None:
            return spoken, {"mode": "ref_continuation", "ref_audio_feat": voice["ref_audio_feat"],
                            "prompt_text": prefix + tail["prompt_text"], "audio_feat": tail["audio_feat"]}
        if mode == _REFERENCE:
            return prefix + spoken, {"mode": "reference", "ref_audio_feat": voice["ref_audio_feat"]}
        cache = {"prompt_text": prefix + voice["prompt_text"], "audio_feat": voice["audio_feat"]}
        if mode == _CONTINUATION:
            return spoken, {**cache, "mode": "continuation"}
        return spoken, {**cache, "mode": "ref_continuation", "ref_audio_feat": voice["ref_audio_feat"]}
