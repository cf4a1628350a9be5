"""Deep Q-learning: network, replay buffer, learner, checkpoints and the inference engine."""
