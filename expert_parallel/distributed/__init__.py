"""Process groups, device selection, autograd-aware collectives and rank discovery."""
