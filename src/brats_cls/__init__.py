"""brats-cls: BraTS brain tumour segmentation with an additional slice classification network.

Nguyen, Le, Nguyen, Nguyen, "Enhancing MRI Brain Tumor Segmentation with an Additional
Classification Network", BraTS 2020.
"""

__version__ = "0.1.0"
