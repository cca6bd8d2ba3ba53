"""The planner: topologies and profiles, the simulator, and `algorithm="auto"`."""
