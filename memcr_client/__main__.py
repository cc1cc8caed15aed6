from memcr_client.cli import main

main()
