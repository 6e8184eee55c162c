"""Audio clips tests send as users' spoken questions: made in code, since no dataset is reachable."""

from __future__ import annotations

import io

import numpy as np
import soundfile


def wav(seconds: float = 1.0, rate: int = 16_000, frequency: float = 220.0, amplitude: float = 0.3,
        subtype: str = "PCM_16", container: str = "WAV") -> bytes:
    """A rising tone: something a speech encoder hears (tests make their own audio; no dataset is reachable)."""
    t = np.arange(int(seconds * rate)) / rate
    clip = io.BytesIO()
    soundfile.write(clip, amplitude * np.sin(2 * np.pi * (frequency + 200 * t) * t), rate, subtype=subtype,
                    format=container)
    return clip.getvalue()
