"""This host's operating system: sockets and addresses, child processes. Torch-free helpers
for the launcher and the rendezvous.
"""
