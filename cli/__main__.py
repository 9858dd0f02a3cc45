from asyndgan.cli.main import main

main()
