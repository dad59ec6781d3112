"""The trainer's reusable pieces (as diffusers has `training_utils`), used by `training/train_pfgm.py` and
`training/export_checkpoint.py`:

- `arguments`: the command line, its checks, and the scheduler and UNet config the flags describe;
- `presets`: settings as data (the no-argument run, the objectives' defaults, the official presets) and `configs/`;
- `objectives`: what `--objective` picks once: the batch, the loss, the settings a checkpoint records;
- `checkpoints`: the output folder (one run at a time, written only inside it), verified checkpoints, pipelines.
"""
