"""Train a tiny LQF model and save δ: run with python (1 process) or accelerate launch (2 processes).

    python tests/multiprocess_train.py OUT.safetensors OUTPUT_DIR METHOD
"""

import sys

from safetensors.torch import save_file
from test_train import deltas, toy_images, toy_model

from lqf_hub import LQFTrainer, LQFTrainingArguments
from lqf_hub.training.trainer import process_state

if __name__ == "__main__":
    out, output_dir, method = sys.argv[1:4]
    model = toy_model()
    args = LQFTrainingArguments(output_dir=output_dir, method=method, epochs=3, batch_size=8, progress=False,
                                kfac_batches=2, tolerance=1e-8)
    LQFTrainer(model, toy_images(16, seed=12), toy_images(6, seed=13), args).train()
    state = process_state()
    if state.is_main_process:
        save_file({"delta": deltas(model)}, out, metadata={"processes": str(state.num_processes)})
