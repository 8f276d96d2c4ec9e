"""Free Spoken Digit Dataset: 8 kHz WAVs -> log-mel "images" of shape (1, 32, 32), numpy only.

Features (docs/data.md): int16 PCM / 32768, cut or zero-padded at the end to 8192 samples
(1.024 s; 99 % of recordings are shorter; longer ones keep their centre), 32 frames of a
256-point Hann-windowed FFT with hop 256 (no overlap), power spectrum projected onto 32
triangular HTK-mel bands over 0-4000 Hz, ln(power + 1e-6), then standardised with the
train-split constants MEAN/STD. Rows are mel bands (low to high), columns time frames.
Split: recordings with index i = 0..4 form the test set (the dataset's own convention);
natural clients are the 6 speakers.
"""

from __future__ import annotations

import io
import re
import tarfile
import wave
from pathlib import Path

import numpy as np

from fedblocks.host.data.dataset import DataMissingError, Dataset, remap_natural_clients, subset_indices
from fedblocks.host.errors import HostError

TARBALL = "fsdd.tar.gz"
SAMPLE_RATE = 8000
WINDOW_SAMPLES = 8192
N_FFT = 256
HOP = 256
N_MELS = 32
N_FRAMES = 32
LOG_FLOOR = 1e-6
# ln-mel statistics over the 2,700 training recordings (measured once with these settings).
MEAN = -10.0
STD = 5.1
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
_NAME = re.compile(r"^(?:.*/)?(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters on the HTK mel scale, shape (n_mels, n_fft // 2 + 1)."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


_MEL = mel_filterbank()
_HANN = np.hanning(N_FFT + 1)[:-1]  # periodic Hann


def read_wav(data: bytes, where: str) -> np.ndarray:
    """Mono 16-bit PCM at 8 kHz -> float64 in [-1, 1)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            pcm = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise HostError(f"{where}: not a readable WAV file ({exc})") from None
    if (channels, width, rate) != (1, 2, SAMPLE_RATE):
        raise HostError(f"{where}: expected mono 16-bit {SAMPLE_RATE} Hz, got {channels} ch {8 * width}-bit {rate} Hz")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0


def log_mel(signal: np.ndarray) -> np.ndarray:
    """(1, N_MELS, N_FRAMES) float32 standardised log-mel features of one recording."""
    if signal.shape[0] > WINDOW_SAMPLES:
        start = (signal.shape[0] - WINDOW_SAMPLES) // 2
        window = signal[start:start + WINDOW_SAMPLES]
    else:
        window = np.zeros(WINDOW_SAMPLES)
        window[: signal.shape[0]] = signal
    frames = window.reshape(N_FRAMES, HOP) * _HANN  # hop == n_fft: non-overlapping frames
    power = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)) ** 2  # (frames, bins)
    mel = np.log(_MEL @ power.T + LOG_FLOOR)  # (mels, frames)
    return ((mel - MEAN) / STD).astype(np.float32)[None]


def load_fsdd(data_dir: Path, limit_train: int | None = None, limit_test: int | None = None) -> Dataset:
    path = data_dir / TARBALL
    if not path.is_file():
        raise DataMissingError(
            f"dataset fsdd: expected {TARBALL} (recordings/{{digit}}_{{speaker}}_{{i}}.wav) in {data_dir}; "
            "pack https://github.com/Jakobovski/free-spoken-digit-dataset's recordings/ as that tarball"
        )
    records: list[tuple[str, int, str, int, np.ndarray]] = []  # split, digit, speaker, i, features
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".wav"):
                    continue
                match = _NAME.match(member.name)
                if match is None:
                    raise HostError(f"{path}: unexpected file '{member.name}' (want {{digit}}_{{speaker}}_{{i}}.wav)")
                digit, speaker, index = int(match.group(1)), match.group(2), int(match.group(3))
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                features = log_mel(read_wav(fh.read(), f"{path}:{member.name}"))
                records.append(("test" if index < 5 else "train", digit, speaker, index, features))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise HostError(f"{path}: cannot read the FSDD tarball ({exc})") from None
    if not records:
        raise HostError(f"{path}: no .wav recordings inside")
    records.sort(key=lambda r: (r[0], r[2], r[1], r[3]))  # split, speaker, digit, index
    train = [r for r in records if r[0] == "train"]
    test = [r for r in records if r[0] == "test"]
    speakers = sorted({r[2] for r in train})
    speaker_of = np.array([speakers.index(r[2]) for r in train], dtype=np.int64)
    natural = [np.flatnonzero(speaker_of == s).astype(np.int64) for s in range(len(speakers))]
    x_train = np.stack([r[4] for r in train]) if train else np.zeros((0, 1, N_MELS, N_FRAMES), np.float32)
    y_train = np.array([r[1] for r in train], dtype=np.int64)
    x_test = np.stack([r[4] for r in test]) if test else np.zeros((0, 1, N_MELS, N_FRAMES), np.float32)
    y_test = np.array([r[1] for r in test], dtype=np.int64)
    tr = subset_indices(len(train), limit_train)
    if tr is not None:
        natural = remap_natural_clients(natural, tr, len(train))
        x_train, y_train = x_train[tr], y_train[tr]
    te = subset_indices(len(test), limit_test)
    if te is not None:
        x_test, y_test = x_test[te], y_test[te]
    return Dataset(
        name="fsdd",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        input_shape=(1, N_MELS, N_FRAMES),
        class_names=CLASS_NAMES,
        natural_clients=natural,
        natural_client_names=speakers,
        source=str(path),
    )
