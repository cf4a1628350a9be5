"""The two training workflows, side by side because they share everything but the traffic:
`sim` (`lbproxy --mode train --env sim`: episodes in the simulator, resumable bit for bit) and `live`
(`--env live`: the real proxy routes with the DQN while it learns). Both write the same run directory
(`run_dir`) and the same CSV rows and progress lines (`report`)."""
