"""Training: losses (section 2.4), augmentation and crops (3.1), schedules and the loop (3.2).

Modules: :mod:`.losses`, :mod:`.augment`, :mod:`.data` (cache, folds, data set, sampler),
:mod:`.schedules`, :mod:`.recipe` (every per-architecture/per-size default), :mod:`.loop`.
"""
