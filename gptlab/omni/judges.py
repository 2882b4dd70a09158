"""Judges that gptlab does not train, for the omni figures: a scikit-learn classifier fit on the real
training digits reads generated images; PocketSphinx (its bundled English model) with a digit-word grammar
transcribes generated speech. Each also reports its ceiling on real data."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError

WORDS = "zero one two three four five six seven eight nine".split()


class DigitJudge:
    """An SVM on the 8×8 training scans (values in [0, 1]); predicts the digit an image shows."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from sklearn.svm import SVC

        self.clf = SVC(gamma="scale").fit(images.reshape(len(images), -1), labels)

    def __call__(self, image: np.ndarray) -> int:
        return int(self.clf.predict(np.asarray(image, np.float32).reshape(1, -1))[0])


class SpeechJudge:
    """PocketSphinx constrained to sequences of digit words; 16 kHz float audio -> the words it heard."""

    def __init__(self, words=WORDS):
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise GptlabError("the speech judge needs the omni extra: pip install 'gptlab[omni]'") from None
        self._dir = tempfile.TemporaryDirectory()
        grammar = Path(self._dir.name) / "digits.jsgf"
        grammar.write_text("#JSGF V1.0;\ngrammar digits;\npublic <utt> = <w>+;\n<w> = " + " | ".join(words) + ";\n")
        self.decoder = Decoder(lm=None, jsgf=str(grammar), loglevel="FATAL")

    def __call__(self, wave: np.ndarray) -> str:
        pad = np.zeros(1600, np.float32)  # 0.1 s of silence on each side
        x = (np.concatenate([pad, np.asarray(wave, np.float32), pad]) * 32767).clip(-32768, 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(x.tobytes(), False, True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp else ""


def word_accuracy(hyp: str, ref: str) -> float:
    """1 - word error rate (Levenshtein over words), floored at 0."""
    h, r = hyp.split(), ref.split()
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (hw != rw))
    return max(0.0, 1.0 - d[-1] / max(len(r), 1))
