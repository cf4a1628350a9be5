"""lbproxy: an asyncio HTTP load-balancing reverse proxy whose backend choice is made by a DQN."""

__version__ = "0.1.0"
