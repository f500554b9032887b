"""Neural style transfer: Gatys et al. optimisation (gatys.py) and Johnson et al. feed-forward networks
(fast_style.py), both scored by perceptual losses (losses.py) on fixed VGG features (vgg.py)."""
