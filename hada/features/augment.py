"""The image augmentation policies of the stored augmented views (``hada features extract --augment N``).

* ``"randaugment"``: torchvision's ``RandAugment()`` with its defaults, at the image's own size (ours).
* ``"albef"``: the published recipe's, ALBEF's training transform for retrieval: a random resized crop to the
  model's input size covering 50-100% of the image (bicubic), a horizontal flip with probability 0.5, then two
  operations drawn with replacement from ALBEF's ten (identity, autocontrast, equalize, brightness, sharpness,
  shear x/y, translate x/y, rotate), each applied with probability 0.5 at magnitude 7 of 10: brightness and
  sharpness by a factor 0.1 + 1.8 * 0.7 = 1.36, a shear of +-0.21, a translation of +-7 pixels, a rotation of +-21
  degrees, grey (128) where the image moves away. HADA-LAVIS makes CLIP's training views with this transform too.
* ``"blip"``: BLIP's training transform (LAVIS's ``blip_image_train``): the same at magnitude 5 of 10.
* ``"lavis"``: a run's policy, not an image's (:data:`RUN_POLICIES`): HADA-LAVIS's, ``blip`` for the main backbone
  (BLIP) and ``albef`` for the others (CLIP). Each backbone's store holds its own policy's views.

Every random draw comes from torch's global generator, so a caller that seeds it (the store seeds it per view and
image) makes a view reproducible whatever process decodes it.
"""

from __future__ import annotations

import math

#: The policies a stored set of views can have been made with.
POLICIES = ("randaugment", "albef", "blip")
#: A run's policy that gives its backbones different ones: ``(main backbone's, the others')``.
RUN_POLICIES = {"lavis": ("blip", "albef")}
#: Every value of ``DataConfig.augment_policy``.
RUN_POLICY_CHOICES = POLICIES + tuple(RUN_POLICIES)


def backbone_policy(policy: str, index: int) -> str:
    """The policy of backbone ``index`` (0: the main one) in a run whose policy is ``policy``."""
    if policy in RUN_POLICIES:
        main, others = RUN_POLICIES[policy]
        return main if index == 0 else others
    return policy

#: ALBEF's operations for retrieval, its magnitude scale and the grey that fills uncovered pixels.
ALBEF_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
             "translate_x", "translate_y", "rotate")
MAX_LEVEL = 10
FILL = [128, 128, 128]


def _uniform() -> float:
    import torch

    return float(torch.rand(()))


def _signed(value: float) -> float:
    """``value`` or ``-value``, each with probability 0.5."""
    return -value if _uniform() < 0.5 else value


def apply_op(image, op: str, level: float):
    """One of :data:`ALBEF_OPS` on a PIL image at ``level`` (0 to :data:`MAX_LEVEL`); the sign of a geometric
    operation is drawn here."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    frac = level / MAX_LEVEL
    linear = InterpolationMode.BILINEAR
    if op == "identity":
        return image
    if op == "autocontrast":
        return TF.autocontrast(image)
    if op == "equalize":
        return TF.equalize(image)
    if op == "brightness":
        return TF.adjust_brightness(image, 0.1 + 1.8 * frac)
    if op == "sharpness":
        return TF.adjust_sharpness(image, 0.1 + 1.8 * frac)
    if op in ("shear_x", "shear_y"):
        angle = math.degrees(math.atan(_signed(0.3 * frac)))
        shear = [angle, 0.0] if op == "shear_x" else [0.0, angle]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=linear,
                         fill=FILL, center=[0, 0])
    if op in ("translate_x", "translate_y"):
        offset = int(round(_signed(10.0 * frac)))
        move = [offset, 0] if op == "translate_x" else [0, offset]
        return TF.affine(image, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=linear,
                         fill=FILL)
    if op == "rotate":
        return TF.rotate(image, _signed(30.0 * frac), interpolation=linear, fill=FILL)
    raise ValueError(f"unknown augmentation {op!r}")


class AlbefAugment:
    """The published policy (module docstring) for a model whose input is ``size`` pixels square."""

    def __init__(self, size: int, ops: int = 2, magnitude: int = 7, scale: tuple[float, float] = (0.5, 1.0)):
        self.size, self.ops, self.magnitude, self.scale = int(size), int(ops), magnitude, scale

    def chosen_ops(self) -> list[str]:
        """The operations of one image: ``ops`` draws with replacement, each kept with probability 0.5."""
        import torch

        drawn = torch.randint(len(ALBEF_OPS), (self.ops,)).tolist()
        return [ALBEF_OPS[i] for i in drawn if _uniform() >= 0.5]

    def __call__(self, image):
        from torchvision import transforms as T

        image = T.RandomResizedCrop(self.size, scale=self.scale,
                                    interpolation=T.InterpolationMode.BICUBIC)(image)
        image = T.RandomHorizontalFlip()(image)
        for op in self.chosen_ops():
            image = apply_op(image, op, self.magnitude)
        return image


def policy_transform(policy: str, size: int):
    """The PIL -> PIL augmentation of ``policy`` for a model with ``size``-pixel inputs."""
    if policy == "albef":
        return AlbefAugment(size)
    if policy == "blip":
        return AlbefAugment(size, magnitude=5)
    if policy == "randaugment":
        from torchvision.transforms import RandAugment

        return RandAugment()
    raise ValueError(f"unknown augmentation policy {policy!r}; choose from {', '.join(POLICIES)}")


def input_size(preprocess_cfg: dict) -> int:
    """A model's square input size from its open_clip preprocessing config."""
    size = preprocess_cfg.get("size", 224)
    return int(size if isinstance(size, int) else max(size))
