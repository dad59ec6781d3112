"""The trainer's speed, measured from outside it, through its loss seam: the trainer keeps no timer of its own.

    accelerate launch benchmarks/trainer_timing.py TIMES.json [train_pfgm.py flags]

runs `training/train_pfgm.py`'s `main` with the objective's loss wrapped in a clock (`main(argv, loss=...)`), and
writes to TIMES.json the wall seconds and CPU milliseconds (`time.process_time`, which other processes' load barely
moves) per optimizer step, over the steps after the first 5 (allocators and caches warm up): from the loss call of
step 6 to the loss call of the last step, so that sample grids and checkpoints, due only at the last step when
`--checkpointing_steps` and `--save_images_steps` exceed `--max_train_steps`, fall outside.
"""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_UP_STEPS = 5


def main(argv):
    sys.path.insert(0, os.path.join(REPO, "training"))
    import train_pfgm

    from pfgm_diffusers.losses import pfgmpp_loss, poisson_field_loss

    output, flags = argv[0], argv[1:]
    args = train_pfgm.parse_args(flags)
    library_loss = poisson_field_loss if args.objective == "poisson_field" else pfgmpp_loss
    accumulation = args.gradient_accumulation_steps
    clock = []  # (wall, CPU) seconds at every loss call

    def clocked_loss(*arguments, **keywords):
        clock.append((time.perf_counter(), time.process_time()))
        return library_loss(*arguments, **keywords)

    train_pfgm.main(flags, loss=clocked_loss)
    first, last = WARM_UP_STEPS * accumulation, len(clock) - accumulation  # the first calls of step 6 and the last
    steps = (last - first) // accumulation
    if steps < 1:
        raise ValueError(
            f"--max_train_steps must exceed {WARM_UP_STEPS + 1} to time a step, got {args.max_train_steps}"
        )
    wall, cpu = (clock[last][i] - clock[first][i] for i in range(2))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(output, "w") as f:
            json.dump(dict(steps=steps, seconds_per_step=wall / steps, cpu_ms_per_step=1000 * cpu / steps), f)


if __name__ == "__main__":
    main(sys.argv[1:])
