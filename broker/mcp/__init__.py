"""``broker mcp``: a Model Context Protocol server for one task, whose tools use the task's credentials
inside this process and return results, never the credentials (design.md, "Agents that never see the secret").

Modules: ``svid`` (where the agent's JWT-SVID comes from: a rotated file or the SPIFFE Workload API),
``bounds`` (pure: results cut to rows, bytes and a time limit; Redis commands parsed and screened),
``tools`` (the tools as plain async methods over a ``broker.sdk.TaskSession``), ``server`` (the official
``mcp`` SDK's server around them, its transports and its redacting log).
"""
