"""`monolith up`: the whole stack on one machine, as supervised processes.

`parts` says what runs (each part's command line, ports, readiness probe and what it waits
for), `supervisor` starts the parts in dependency order, restarts one that dies and stops
them in reverse order, `manifest` writes `stack.json` for the clients, and `service` is the
command. The stack imports no role: it starts each one as a `monolith <role>` process.
"""
