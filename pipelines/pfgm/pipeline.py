"""Entry point for diffusers' `custom_pipeline` loader.

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="path/to/pipelines/pfgm", trust_remote_code=True)

diffusers imports this file (`pipeline.py` of the folder) and uses the one `DiffusionPipeline` subclass it finds; it is
`pfgm_diffusers.PFGMPipeline`, so `pfgm_diffusers` must be installed. The folder is deliberately not named after a
diffusers pipeline folder (`ddpm`, `ddim`, ...), which would make diffusers resolve saved library names wrongly.
"""

from pfgm_diffusers import PFGMPipeline

__all__ = ["PFGMPipeline"]
