// Self-test kernels of the emulator (python_tests/test_emulator.py): filled in next.
