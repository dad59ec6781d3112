"""Class labels of a class-conditional UNet: the names saved with a pipeline, the null class that classifier-free
guidance uses (the last class embedding, from `--class_dropout_prob`), and the (B,) label tensor of one call."""

import torch

from .validation import is_integer

__all__ = ["check_class_names", "check_null_class_label", "prepare_class_labels"]


def short_repr(value, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_null_class_label(null_class_label, num_class_embeds) -> None:
    """The null class is the last class embedding, or there is none."""
    if null_class_label is None:
        return
    if num_class_embeds is None or num_class_embeds < 2:
        raise ValueError(
            f"null_class_label={null_class_label!r} needs a class-conditional UNet with at least 2 class embeddings, "
            f"got num_class_embeds={num_class_embeds}."
        )
    if isinstance(null_class_label, bool) or null_class_label != num_class_embeds - 1:
        raise ValueError(
            f"null_class_label must be the last class embedding, {num_class_embeds - 1} (num_class_embeds="
            f"{num_class_embeds}), or None, got {null_class_label!r}."
        )


def check_class_names(class_names, num_class_embeds, null_class_label=None) -> None:
    """One name per class embedding of the UNet (the null class has none), or none."""
    if class_names is None:
        return
    num_classes = num_class_embeds
    if num_classes is not None and null_class_label is not None:
        num_classes -= 1
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ValueError(f"`class_names` must be a list of strings, got {short_repr(class_names)}.")
    if num_classes is None or len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class_names for a UNet with num_class_embeds={num_classes}: give one name per"
            " class, in label order (or none)."
        )


def label_index(label, class_names) -> int:
    """An int label, or the index of a class name in the pipeline's `class_names`."""
    if is_integer(label):
        return int(label)
    if isinstance(label, str):
        if class_names is None:
            raise ValueError(f"class label {label!r} is a name, but the pipeline has no `class_names`: pass ints.")
        if label not in class_names:
            raise ValueError(f"Unknown class name {label!r}: the pipeline's class_names are {class_names}.")
        return class_names.index(label)
    raise ValueError(
        f"class_labels must be ints, class names, a list of them or an integer tensor, got {short_repr(label)}."
    )


def random_labels(num_classes: int, batch_size: int, generator) -> torch.Tensor:
    """Uniform labels (B,); with a generator list, label i comes from generator i (as in a single-image run)."""
    if isinstance(generator, list):
        return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randint(num_classes, (batch_size,), generator=generator, device=device).cpu()


def prepare_class_labels(
    class_labels, batch_size, num_classes, class_names=None, null_class=None, generator=None, required=False
) -> torch.Tensor | None:
    """`class_labels` (None, an int or name, a list of them, or an integer tensor) as a (B,) long tensor on the CPU;
    None for an unconditional UNet (`num_classes` None). Missing labels are drawn uniformly from `generator` unless
    `required`. `null_class` (guidance's, not a class of its own) only names itself in the range error."""
    if num_classes is None and class_labels is not None:
        raise ValueError(
            f"class_labels={short_repr(class_labels)} were given but the UNet has no class embedding "
            "(unet.config.num_class_embeds is None): it is unconditional."
        )
    if num_classes is None:
        return None
    if class_labels is None and required:
        raise ValueError(f"The UNet is class-conditional (num_class_embeds={num_classes}): pass `class_labels`.")
    if class_labels is None:
        return random_labels(num_classes, batch_size, generator)
    if isinstance(class_labels, torch.Tensor):
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
            raise ValueError(f"class_labels must be an integer tensor of shape ({batch_size},), got {class_labels}.")
        labels = class_labels.reshape(-1).cpu().long().expand(batch_size if class_labels.ndim == 0 else -1)
    else:
        single = not isinstance(class_labels, (list, tuple))
        values = [class_labels] * batch_size if single else list(class_labels)
        labels = torch.tensor([label_index(value, class_names) for value in values], dtype=torch.long)
    if labels.shape[0] != batch_size:
        raise ValueError(f"Got {labels.shape[0]} class_labels for a batch of {batch_size}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        null = "" if null_class is None else f"; the null class {null_class} is guidance_scale=0's"
        raise ValueError(
            f"class_labels must lie in [0, {num_classes - 1}] ({num_classes} classes{null}), got {labels.tolist()}."
        )
    return labels
