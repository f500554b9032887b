"""Explaining classifiers: the shapes classifier, attribution maps and their measures, adversarial examples."""
