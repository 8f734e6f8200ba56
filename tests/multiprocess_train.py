"""Train a tiny LQF model and save δ: run with python (1 process) or accelerate launch (2 processes).

    python tests/multiprocess_train.py OUT.pt OUTPUT_DIR
"""

import sys

import torch
from test_train import deltas, toy_images, toy_model

from lqf_hub.train import LQFTrainer, LQFTrainingArguments, process_state

if __name__ == "__main__":
    out, output_dir = sys.argv[1], sys.argv[2]
    model = toy_model()
    args = LQFTrainingArguments(output_dir=output_dir, epochs=3, batch_size=8, progress=False, kfac_batches=2)
    LQFTrainer(model, toy_images(16, seed=12), toy_images(6, seed=13), args).train()
    state = process_state()
    if state.is_main_process:
        torch.save({"delta": deltas(model), "processes": state.num_processes}, out)
