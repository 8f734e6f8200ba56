"""Train a tiny LQF model in its own process, optionally killed with SIGKILL at an optimizer step.

    python tests/resumable_train.py OUTPUT_DIR DELTA.safetensors [--kill-at-step K] [--resume-from DIR]
"""

import argparse
import os
import signal

import torch
from safetensors.torch import save_file
from test_train import deltas, toy_images, toy_model

from lqf_hub import LQFTrainer, LQFTrainingArguments

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("delta_file")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume-from", default=None)
    options = parser.parse_args()
    if options.kill_at_step is not None:  # die like `kill -9`: no cleanup, no exception handlers
        step, calls = torch.optim.SGD.step, [0]

        def step_then_die(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == options.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args, **kwargs)

        torch.optim.SGD.step = step_then_die
    model = toy_model()
    args = LQFTrainingArguments(output_dir=options.output_dir, method="sgd", epochs=4, batch_size=4, progress=False,
                                resume_from=options.resume_from)
    LQFTrainer(model, toy_images(16, seed=6), toy_images(6, seed=7), args).train()
    save_file({"delta": deltas(model)}, options.delta_file)
