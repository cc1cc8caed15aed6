"""The ptrace engine and the parasite (CRIU's compel): freeze a process, run code in it, let it go.

Architecture-specific bits (registers, syscall numbers, blobs) live in
`arch`; nothing here knows what a dump is.
"""
