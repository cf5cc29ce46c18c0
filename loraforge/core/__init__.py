"""What every layer uses: the one error type, device choice, row files, facts about the clients.
Imports nothing else of loraforge."""
