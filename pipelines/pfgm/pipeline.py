"""Entry point for diffusers tools that load a pipeline through a `custom_pipeline` file path.

You do not need it: `PFGMPipeline.from_pretrained(folder_or_repo)`, or `DiffusionPipeline.from_pretrained(folder)`
after `import pfgm_diffusers`, load a saved pipeline without running any file. If a tool insists on
`custom_pipeline`, give the ABSOLUTE path of this `.py` file in your own checkout: diffusers reads a relative folder
such as "pipelines/pfgm" as a Hub repository id when it is not found from the working directory, and downloads and
runs that repository's code. This file only imports `pfgm_diffusers.PFGMPipeline` (the package must be installed).
Its folder is deliberately not named after a diffusers pipeline folder (`ddpm`, `ddim`, ...), which would make
diffusers resolve saved library names wrongly.
"""

from pfgm_diffusers import PFGMPipeline

__all__ = ["PFGMPipeline"]
