"""VoxCPM-1.5 through the `voxcpm` package (2.0.3), one model on one device.

We drive `VoxCPMModel` (the package's own generation loop) rather than the `VoxCPM` wrapper so that
a cloned voice's encoded prompt can be built once and cached: the wrapper re-encodes it every call.

Voice carry (Engine.supports_carry): a chunk after the first continues from the previous chunk's tail,
encoded like a voice prompt but from memory and never cached (it is this request's alone). Given a
voice as well, the voice conditions every chunk and the carry is left out: VoxCPM-1.5 takes one
continuation prompt, and the voice is the one the user chose; chaining generated chunks instead would
let each copy drift a little further from the clone and pass any artefact on to every later chunk,
while the voice alone already gives every chunk the same speaker.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ...audio import time_stretch
from ...text import CJK_RANGES, has_speakable
from ..base import (CloneMode, Continuation, Engine, EngineError, EngineInfo, NothingToSay, Preset,
                    SynthesisParams, VoicePrompt)
from .load import load_voxcpm

log = logging.getLogger(__name__)

_PROMPT_CACHE_SIZE = 32


def pick_device(requested: str) -> tuple[str, str]:
    """Resolve TTS_DEVICE to a torch device, with the reason (logged at start)."""
    import torch

    requested = requested.strip().lower()
    if requested in ("", "auto"):
        if torch.cuda.is_available():
            # Exactly "cuda": the package only enables its torch.compile path for that string.
            return "cuda", f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        return "cpu", "auto: no CUDA device visible to torch"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"TTS_DEVICE={requested} but torch sees no CUDA device; "
                          "check the GPU reservation/drivers or set TTS_DEVICE=auto")
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise EngineError(f"TTS_DEVICE={requested} is not supported; use auto, cpu, cuda or cuda:N")
    return requested, "set by TTS_DEVICE"


class VoxCPMEngine(Engine):
    name = "voxcpm"
    architecture = "voxcpm"  # config.json's, as the package's loader reads it
    languages: tuple[str, ...] = ("en", "zh")
    clone_modes: tuple[str, ...] = (CloneMode.CONTINUATION.value,)
    supports_instructions = False
    supports_batching = True
    supports_carry = True
    samples_per_token_before_load = 4 * 1764  # VoxCPM-1.5's (info() before the load reads the model's)

    def __init__(self, model_dir: Path, device: str = "auto", compile_mode: str = "auto",
                 cfg_value: float = 2.0, inference_timesteps: int = 10, max_len: int = 2048,
                 normalize: bool = False, retry_badcase: bool = True, max_chunk_chars: int = 200,
                 fixed_tokens: int = 0, cuda_graphs: bool = True, compile_step: bool = False, serial: bool = False,
                 memory_share: float = 1.0):
        self.model_dir = Path(model_dir)
        self.requested_device = device
        self.compile_mode = compile_mode
        self.defaults = dict(cfg_value=cfg_value, inference_timesteps=inference_timesteps, max_len=max_len,
                             normalize=normalize)
        self.retry_badcase = retry_badcase and not fixed_tokens
        self.fixed_tokens = fixed_tokens
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        # This model's part of the GPU memory free when it loads (service/models.py: memory_share).
        self.memory_share = memory_share
        # TTS_MAX_BATCH=1: the package's own loop serves every request (else the batched step does).
        self.serial = serial
        self.max_chunk_chars = max_chunk_chars
        self.sample_rate = 44100
        self.voice_sample_rate = 44100  # what the VAE encodes (VoxCPM-1.5: its output rate too)
        self.device = "cpu"
        self._model = None  # voxcpm.model.voxcpm.VoxCPMModel
        self._normalizer = None
        self._prompts: OrderedDict[str, dict] = OrderedDict()
        self._prompts_lock = threading.Lock()

    def load(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise EngineError(f"no VoxCPM checkpoint at {self.model_dir} (config.json missing); "
                              "check MODEL_DIR or the bootstrap pull")
        try:
            import torch  # noqa: F401
            import voxcpm.model.voxcpm  # noqa: F401
        except ImportError as e:
            raise EngineError(f"the voxcpm package is not importable ({e}); "
                              "install requirements/runtime.txt and voxcpm --no-deps") from e
        self.device, why = pick_device(self.requested_device)
        # The package's torch.compile (about a minute on the first start) only speeds up its own loop,
        # which serves requests only when batching is off; the batched step runs as CUDA graphs.
        optimize = self.compile_mode == "on" or (self.compile_mode == "auto" and self.device == "cuda" and self.serial)
        log.info("voxcpm: loading %s on %s (%s), torch.compile %s", self.model_dir, self.device, why,
                 "on" if optimize else "off")
        self._model = load_voxcpm(self.model_dir, self.device, optimize, self.architecture)
        self.sample_rate = int(self._model.sample_rate)
        self.voice_sample_rate = int(getattr(self._model, "_encode_sample_rate", self.sample_rate))
        if self.defaults["normalize"]:
            self._normalizer_or_raise()

    def _normalizer_or_raise(self):
        if self._normalizer is None:
            try:
                from voxcpm.utils.text_normalize import TextNormalizer
            except ImportError as e:
                raise EngineError(f"VoxCPM text normalisation needs extra packages ({e}); "
                                  "send normalize=false or install them") from e
            self._normalizer = TextNormalizer()
        return self._normalizer

    def _normalize(self, text: str, lang: Optional[str] = None) -> str:
        # wetext asserts on input it reduces to nothing ("...", emoji) and the generator then divides
        # by the empty text's length: both are the client's text, not a fault of ours.
        try:
            out = self._normalizer_or_raise().normalize(text)
        except AssertionError:
            out = ""
        if not has_speakable(out):
            raise NothingToSay(f"VoxCPM's text normalisation left nothing to say in {text[:40]!r}; "
                               "send words, or normalize=false")
        return out

    def _prompt_cache(self, prompt: Optional[VoicePrompt]) -> Optional[dict]:
        if prompt is None:
            return None
        with self._prompts_lock:
            cached = self._prompts.get(prompt.voice_id)
            if cached is not None:
                self._prompts.move_to_end(prompt.voice_id)
                return cached
        cache = self._encode_prompt(prompt)
        with self._prompts_lock:
            self._prompts[prompt.voice_id] = cache
            while len(self._prompts) > _PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return cache

    def _encode_prompt(self, prompt: VoicePrompt) -> dict:
        """The package's build_prompt_cache, minus torchaudio.load (which needs torchcodec + FFmpeg)."""
        return self._encode_audio(self._read_clip(prompt.wav_path, self.sample_rate), prompt.text)

    @staticmethod
    def _read_clip(path: Path, rate: int) -> np.ndarray:
        import soundfile as sf

        from ...audio import resample

        audio, source_rate = sf.read(str(path), dtype="float32", always_2d=True)
        return resample(audio.mean(axis=1), source_rate, rate)

    def _encode_audio(self, audio: np.ndarray, text: str) -> dict:
        """A prompt cache from audio at the model's rate and its transcript."""
        return {"prompt_text": text, "audio_feat": self._latents(audio, self.sample_rate)}

    def _latents(self, audio: np.ndarray, rate: int, pad_left: bool = True):
        """Audio at `rate` (what the VAE encodes) as the VAE's latent patches (T, patch, latent)."""
        import torch
        import torch.nn.functional as F

        m = self._model
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
        patch_len = m.patch_size * m.chunk_size
        if wav.size(1) % patch_len:
            # A continuation prompt is left-padded so its real audio sits next to the generated audio; a
            # reference (VoxCPM2) is right-padded, as the package does.
            pad = patch_len - wav.size(1) % patch_len
            wav = F.pad(wav, (pad, 0) if pad_left else (0, pad))
        with torch.inference_mode():
            feat = m.audio_vae.encode(wav.to(m.device), rate).cpu()
        return feat.view(m.audio_vae.latent_dim, -1, m.patch_size).permute(1, 2, 0)

    def forget_voice(self, voice_id: str) -> None:
        with self._prompts_lock:
            self._prompts.pop(voice_id, None)

    def _carry_cache(self, carry: Optional[Continuation], normalize: bool) -> Optional[dict]:
        """The previous chunk's tail as a prompt cache (see the module docstring)."""
        text = self._carry_text(carry, normalize)
        return None if text is None else self._encode_audio(carry.audio, text)

    def _carry_text(self, carry: Optional[Continuation], normalize: bool, lang: Optional[str] = None) -> Optional[str]:
        """What the carried tail says, as the model gets it before this chunk's text; None: carry nothing."""
        if carry is None or carry.audio.size == 0:
            return None
        text = carry.text
        if normalize:
            try:
                text = self._normalize(text, lang)
            except NothingToSay:  # a tail of symbols only: this chunk goes on its own rather than fail
                return None
        # The package joins prompt and target text as they are: keep the words apart, as in the request.
        if text and not text[-1].isspace() and not any(lo <= text[-1] <= hi for lo, hi in CJK_RANGES):
            text += " "
        return text

    def _generation_args(self, text: str, prompt: Optional[VoicePrompt], params: SynthesisParams,
                         carry: Optional[Continuation] = None) -> dict:
        normalize = self.defaults["normalize"] if params.normalize is None else params.normalize
        if normalize:
            text = self._normalize(text, params.lang)
        target, prompt_cache = self._condition(text, prompt, params, carry, normalize)
        args = dict(
            target_text=target,
            prompt_cache=prompt_cache,
            max_len=min(params.max_len or self.defaults["max_len"], self.defaults["max_len"]),
            inference_timesteps=params.inference_timesteps or self.defaults["inference_timesteps"],
            cfg_value=params.cfg_value or self.defaults["cfg_value"],
        )
        if self.fixed_tokens:
            # min_len = max_len: the loop never stops early; the ratio cap would shorten short texts.
            args.update(min_len=self.fixed_tokens, max_len=self.fixed_tokens, retry_badcase_ratio_threshold=1e9)
        return args

    def _condition(self, text: str, prompt: Optional[VoicePrompt], params: SynthesisParams,
                   carry: Optional[Continuation], normalize: bool) -> tuple[str, Optional[dict]]:
        """(the text the model is given, the prompt cache it generates from) for one chunk."""
        return text, self._prompt_cache(prompt) if prompt is not None else self._carry_cache(carry, normalize)

    @staticmethod
    def _seed_package(params: SynthesisParams) -> None:
        """The package's loop draws its noise from the process-wide RNG: seeded here for its generation
        only (a batched row has a generator of its own, and the batch never touches this one)."""
        if params.seed is not None:
            import torch

            torch.manual_seed(params.seed)

    def stream(self, text: str, preset: str, prompt: Optional[VoicePrompt],
               params: SynthesisParams, carry: Optional[Continuation] = None) -> Iterator[np.ndarray]:
        if abs(params.speed - 1.0) > 1e-3:
            # VoxCPM has no tempo control; a phase vocoder needs the whole sentence to sound right.
            yield self.synthesize(text, preset, prompt, params, carry)
            return
        args = self._generation_args(text, prompt, params, carry)
        self._seed_package(params)
        gen = self._model.generate_with_prompt_cache_streaming(**args)
        try:
            for wav, _, _ in gen:
                yield wav.squeeze(0).float().cpu().numpy()
        finally:
            gen.close()

    def synthesize(self, text: str, preset: str, prompt: Optional[VoicePrompt],
                   params: SynthesisParams, carry: Optional[Continuation] = None) -> np.ndarray:
        args = self._generation_args(text, prompt, params, carry)
        self._seed_package(params)
        wav, _, _ = self._model.generate_with_prompt_cache(**args, retry_badcase=self.retry_badcase)
        return time_stretch(wav.squeeze(0).float().cpu().numpy(), params.speed)

    # -- continuous batching (service/engines/voxcpm/batch.py) ----------------------------------------
    @property
    def batch_single(self) -> bool:
        """On CUDA even one request goes through the batched step: it runs as CUDA graphs, where the
        package's own loop pays a compile warm-up per start. On the CPU the package's loop is as fast."""
        return self.device.startswith("cuda") and not self.serial

    def batch_size(self, requested: str, cap: int) -> int:
        """TTS_MAX_BATCH: a number, or auto (from free GPU memory on CUDA; 1 = one at a time on CPU);
        never more than `cap`, the requests the worker's threads can carry (Settings.batch_capacity)."""
        if requested.strip().lower() not in ("", "auto"):
            return max(1, min(cap, int(requested)))
        if not self.device.startswith("cuda"):
            return 1
        import torch

        from .batch import pick_max_batch

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        mine = int(free * self.memory_share)
        size = pick_max_batch(mine, self._model, cap=min(cap, 128), max_steps=self._max_steps)
        log.info("voxcpm: batch size %d from %.1f GiB of GPU memory (%.0f%% of the %.1f GiB free; thread budget %d)",
                 size, mine / 2**30, self.memory_share * 100, free / 2**30, cap)
        return size

    @property
    def _max_steps(self) -> int:
        return max(self.fixed_tokens, self.defaults["max_len"])

    def make_batch(self, max_batch: int):
        from .batch import BatchedGenerator

        return BatchedGenerator(self._model, max_batch, max_steps=self._max_steps, cuda_graphs=self.cuda_graphs,
                                compile_backend="inductor" if self.compile_step else None)

    def prepare_batch(self, batch) -> None:
        """Capture the batched step's CUDA graphs for every batch size at the default step count."""
        captured = batch.prepare(self.defaults["inference_timesteps"])
        if captured:
            log.info("voxcpm: %d CUDA graphs captured for batch sizes %s", captured, list(batch.buckets))

    def batch_add(self, batch, requests: list[tuple[str, Optional[VoicePrompt], SynthesisParams]],
                  carries: Optional[list[Optional[Continuation]]] = None) -> list[int]:
        """Join (text, voice, params) requests to the batch, prefilled together; returns their rows."""
        from .batch import Join

        joins = []
        for (text, prompt, params), carry in zip(requests, carries or [None] * len(requests)):
            args = self._generation_args(text, prompt, params, carry)
            fixed = {"min_len": args["min_len"], "length_ratio": None} if self.fixed_tokens else {}
            joins.append(Join(args["target_text"], args["prompt_cache"], max_len=args["max_len"],
                              inference_timesteps=args["inference_timesteps"], cfg_value=args["cfg_value"],
                              seed=params.seed, **fixed))
        return batch.add_many(joins)

    def batch_key(self, params: SynthesisParams) -> None:
        """Every request can share a step with every other (each row has its own time grid)."""
        return None

    def _samples_per_token(self) -> int:
        if self._model is None:
            return self.samples_per_token_before_load
        from .family import samples_per_token

        return samples_per_token(self._model)

    def presets(self) -> dict[str, Preset]:
        return {"default": Preset("default", "The model's own voice (no prompt audio)", self.languages)}

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model=f"{self.name}:{self.model_dir.name}", device=self.device,
                          sample_rate=self.sample_rate, languages=self.languages, supports_cloning=True,
                          clone_modes=self.clone_modes, voice_sample_rate=self.voice_sample_rate,
                          supports_instructions=self.supports_instructions,
                          token_rate=self.sample_rate / self._samples_per_token(),
                          details={**self.defaults, "cuda_graphs": self.cuda_graphs, "compile_step": self.compile_step,
                                   "memory_share": round(self.memory_share, 4),
                                   **({"fixed_tokens": self.fixed_tokens} if self.fixed_tokens else {})})
