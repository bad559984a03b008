"""Import Hugging Face directories at the launched TP/PP layout; save logits and re-export.

    torchrun --nproc-per-node N hf_worker.py OUT_DIR TP PP HF_DIR [HF_DIR ...]
For each HF_DIR (named NAME): OUT_DIR/NAME.pt holds the full logits of fixed tokens and
OUT_DIR/NAME_export is the model exported back from this layout.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    out, tp, pp, dirs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    from nemo_aligner.checkpoint.hf import export_hf_model, import_hf_model
    from nemo_aligner.models.forward import full_logits
    from nemo_aligner.utils import distributed

    distributed.initialize(tp, pp)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    for hf_dir in dirs:
        name = Path(hf_dir).name
        model, cfg = import_hf_model(hf_dir)
        logits = full_logits([model], tokens)
        if dist.get_rank() == 0:
            torch.save(logits, out / f"{name}.pt")
        export_hf_model(model, cfg, out / f"{name}_export")
    distributed.destroy()


if __name__ == "__main__":
    main()
