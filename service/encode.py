"""Encoding float audio to the response formats, whole or incrementally for streams (soundfile; AAC through
FFmpeg, which the PyAV wheel ships)."""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .audio import resample, to_pcm16


@dataclass(frozen=True)
class Format:
    name: str
    content_type: str
    sf_format: str | None  # None: raw PCM written by hand, or an FFmpeg format (ffmpeg_format)
    sf_subtype: str | None
    fixed_rates: tuple[int, ...] = ()  # codecs that only accept some rates (Opus, AAC)
    ffmpeg_format: str | None = None  # written by FFmpeg (PyAV): its muxer's name


FORMATS: dict[str, Format] = {
    "wav": Format("wav", "audio/wav", "WAV", "PCM_16"),
    "flac": Format("flac", "audio/flac", "FLAC", "PCM_16"),
    "mp3": Format("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "opus": Format("opus", "audio/ogg; codecs=opus", "OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
    "pcm": Format("pcm", "audio/L16", None, None),
    # AAC in ADTS: every frame carries its own header, so it streams, and a file is all of its frames.
    # AAC's sampling frequencies (ISO 14496-3) include every rate this service offers.
    "aac": Format("aac", "audio/aac", None, None,
                  (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000), "adts"),
}
STREAMABLE = ("pcm", "wav", "opus", "aac")


def codec_rate(fmt: Format, rate: int) -> int:
    """The rate the codec will actually carry: Opus only takes a few, so we go up to the nearest."""
    if fmt.fixed_rates and rate not in fmt.fixed_rates:
        return next((r for r in fmt.fixed_rates if r >= rate), fmt.fixed_rates[-1])
    return rate


def encode(audio: np.ndarray, rate: int, fmt_name: str) -> bytes:
    fmt = FORMATS[fmt_name]
    target = codec_rate(fmt, rate)
    audio = resample(audio, rate, target)
    if fmt.ffmpeg_format is not None:
        sink = _AppendOnlySink()
        writer = _FfmpegFile(sink, fmt, target)
        writer.write(audio)
        writer.close()
        return sink.take()
    if fmt.sf_format is None:
        return to_pcm16(audio)
    buf = io.BytesIO()
    sf.write(buf, audio, target, format=fmt.sf_format, subtype=fmt.sf_subtype)
    return buf.getvalue()


def wav_stream_header(rate: int, channels: int = 1) -> bytes:
    """A PCM16 WAV header with 'unknown' (max) sizes, for streams whose length is not known yet."""
    byte_rate = rate * channels * 2
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, byte_rate, channels * 2, 16) +
            b"data" + struct.pack("<I", unknown))


class _AppendOnlySink(io.RawIOBase):
    """A write-only file for libsndfile that hands out bytes as soon as they are written.

    Ogg pages are written strictly in order; a rewrite of bytes already handed out (which Ogg does
    not do, but other containers' writers do on close) could not be taken back, so it is dropped.
    MP3 is not streamed for that reason: its writer rewrites a header frame with totals on close,
    and without it decoders mis-size the stream.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._end = 0  # bytes written (and handed out or pending) so far
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        if self._pos >= self._end:
            self._chunks.append(data)
            self._end += len(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


class _FfmpegFile:
    """A mono audio file written through FFmpeg (PyAV) into a sink, with soundfile's write/close.

    Each packet is flushed to the sink as it is muxed (flush_packets), so a stream's bytes leave as the
    encoder makes them instead of waiting for FFmpeg's I/O buffer to fill.
    """

    # Bits per second per Hz of sample rate: 96 kb/s at 48 kHz, 16 kb/s at 8 kHz (mono speech).
    BITS_PER_HZ = 2

    def __init__(self, sink: io.RawIOBase, fmt: Format, rate: int):
        import av  # FFmpeg is loaded only by a worker that is asked for such a format

        self._av = av
        self._container = av.open(sink, "w", format=fmt.ffmpeg_format, options={"flush_packets": "1"})
        self._stream = self._container.add_stream(fmt.name, rate=rate, layout="mono")
        self._stream.bit_rate = self.BITS_PER_HZ * rate
        # The encoder takes whole frames of its frame size (1024 for AAC); this buffers pushes into them.
        self._frames = av.AudioResampler(format=self._stream.codec_context.format, layout="mono", rate=rate,
                                         frame_size=self._stream.codec_context.frame_size or None)
        self._rate = rate

    def write(self, audio: np.ndarray) -> None:
        if audio.size == 0:
            return
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1),
                                                 format="flt", layout="mono")
        frame.sample_rate = self._rate
        self._encode(self._frames.resample(frame))

    def close(self) -> None:
        self._encode(self._frames.resample(None))
        self._encode([None])  # drains the encoder
        self._container.close()

    def _encode(self, frames) -> None:
        for frame in frames:
            self._container.mux(self._stream.encode(frame))


class StreamEncoder:
    """Encodes successive float chunks into bytes of one continuous stream (pcm, wav, ogg/opus, adts/aac)."""

    def __init__(self, fmt_name: str, in_rate: int, out_rate: int):
        if fmt_name not in STREAMABLE:
            raise ValueError(f"{fmt_name} cannot be streamed; use one of {', '.join(STREAMABLE)}")
        self.fmt = FORMATS[fmt_name]
        self.rate = codec_rate(self.fmt, out_rate)
        self.in_rate = in_rate
        self.seconds = 0.0  # audio pushed so far
        rate = in_rate
        # A stateful resampler: resampling each chunk on its own would click at every chunk edge.
        self._resampler = soxr.ResampleStream(rate, self.rate, 1, dtype="float32") if self.rate != rate else None
        self._sink: _AppendOnlySink | None = None
        self._file: sf.SoundFile | _FfmpegFile | None = None
        if self.fmt.ffmpeg_format is not None:
            self._sink = _AppendOnlySink()
            self._file = _FfmpegFile(self._sink, self.fmt, self.rate)
        elif self.fmt.name == "opus":
            self._sink = _AppendOnlySink()
            self._file = sf.SoundFile(self._sink, "w", self.rate, 1, format=self.fmt.sf_format,
                                      subtype=self.fmt.sf_subtype)

    def header(self) -> bytes:
        return wav_stream_header(self.rate) if self.fmt.name == "wav" else b""

    def push(self, audio: np.ndarray, last: bool = False) -> bytes:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.seconds += audio.size / self.in_rate
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        if self._file is None:
            return to_pcm16(audio)
        self._file.write(audio)
        return self._sink.take()

    def close(self) -> bytes:
        tail = self.push(np.zeros(0, dtype=np.float32), last=True) if self._resampler is not None else b""
        if self._file is None:
            return tail
        self._file.close()
        return tail + self._sink.take()
