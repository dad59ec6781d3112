"""Class labels of a class-conditional UNet: by index or by the pipeline's `class_names`, checked, or drawn."""

import torch

from .validation import is_integer


def check_class_names(class_names, num_classes) -> None:
    """One name (a string) per class embedding of the UNet (`num_class_embeds`), or none."""
    if class_names is None:
        return
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ValueError(f"`class_names` must be a list of strings, got {short_repr(class_names)}.")
    if num_classes is None or len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class_names for a UNet with num_class_embeds={num_classes}: give one name per"
            " class, in label order (or none)."
        )


def prepare_class_labels(class_labels, num_classes, class_names, batch_size, generator=None, device=None,
                         required=False):  # fmt: skip
    """`class_labels` (None, an int or name, a list of them, or an integer tensor) as a (B,) long tensor; None for
    an unconditional UNet (`num_classes` None). Missing labels are drawn uniformly from `generator` unless
    `required`."""
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
        return _random_labels(num_classes, batch_size, generator).to(device)
    if isinstance(class_labels, torch.Tensor):
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
            raise ValueError(f"class_labels must be an integer tensor of shape ({batch_size},), got {class_labels}.")
        labels = class_labels.reshape(-1).cpu().long().expand(batch_size if class_labels.ndim == 0 else -1)
    else:
        single = not isinstance(class_labels, (list, tuple))
        values = [class_labels] * batch_size if single else list(class_labels)
        labels = torch.tensor([_label_index(value, class_names) for value in values], dtype=torch.long)
    if labels.shape[0] != batch_size:
        raise ValueError(f"Got {labels.shape[0]} class_labels for a batch of {batch_size}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"class_labels must lie in [0, {num_classes - 1}] (num_class_embeds={num_classes}), got {labels.tolist()}."
        )
    return labels.to(device)


def _label_index(label, class_names):
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


def short_repr(value, limit=60):
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _random_labels(num_classes, batch_size, generator):
    """Uniform labels (B,); with a generator list, label i comes from generator i (as in a single-image run)."""
    if isinstance(generator, list):
        return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randint(num_classes, (batch_size,), generator=generator, device=device).cpu()
