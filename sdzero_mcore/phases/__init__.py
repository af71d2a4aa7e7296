"""Training phases: SRT collection and training, Phase 2 self-distillation; each one job."""
