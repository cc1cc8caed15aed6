from memcr.cli import main

main()
