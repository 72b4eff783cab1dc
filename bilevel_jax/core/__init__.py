"""Core MDP maths: the tabular MDP pytree, soft value iteration, evaluation, rollouts."""
