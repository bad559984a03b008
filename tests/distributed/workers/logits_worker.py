"""Load a checkpoint at the launched TP/PP layout and save the logits of fixed tokens.

    torchrun --nproc-per-node N logits_worker.py CKPT OUT.pt TP PP
"""

import sys

import torch
import torch.distributed as dist


def main():
    ckpt, out, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from nemo_aligner.models.forward import full_logits
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.setup import model_from_checkpoint

    distributed.initialize(tp, pp)
    model = model_from_checkpoint(ckpt)
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = full_logits([model], tokens)
    if dist.get_rank() == 0:
        torch.save(logits, out)
    distributed.destroy()


if __name__ == "__main__":
    main()
