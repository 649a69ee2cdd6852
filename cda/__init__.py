"""Context Decoupling Augmentation (spec 10): the object bank (``cda.bank``) and composites (``cda.composite``)."""
