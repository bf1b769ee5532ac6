"""megassm models in the diffusers ecosystem: ``HTHTransformerModel`` (a diffusers ``ModelMixin``) and
``HTHPipeline`` (a ``DiffusionPipeline``), loaded from a directory written by ``megassm convert to-diffusers``.

    from megassm.diffusers import HTHPipeline
    pipe = HTHPipeline.from_pretrained("hth-diffusers")
    images = pipe("a red square", generator=torch.Generator().manual_seed(0)).images
"""

from megassm.diffusers.pipeline import HTHPipeline, HTHPipelineOutput
from megassm.diffusers.transformer import HTHTransformerModel

__all__ = ["HTHPipeline", "HTHPipelineOutput", "HTHTransformerModel"]
