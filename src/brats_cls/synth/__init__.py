"""Phantom BraTS cases: :mod:`.anatomy` (template and warp), :mod:`.tumour` (lesions), :mod:`.style` (the
look drawn per case), :mod:`.render` (the four modalities), :mod:`.phantom` (cases and files),
:mod:`.preview` (a montage) and :mod:`.cli` (``brats-cls synth``). See :mod:`.phantom` first."""

from .anatomy import BRATS_SHAPE, SMALL_SHAPE, brats_geometry, brats_template
from .phantom import DEFAULT_HEALTHY_FRACTION, PhantomCase, case_id, is_healthy, make_case, write_case, write_cases
from .preview import write_preview
from .tumour import KINDS

__all__ = ["BRATS_SHAPE", "DEFAULT_HEALTHY_FRACTION", "KINDS", "SMALL_SHAPE", "PhantomCase", "brats_geometry",
           "brats_template", "case_id", "is_healthy", "make_case", "write_case", "write_cases", "write_preview"]
