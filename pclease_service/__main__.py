from pclease_service.cli import main

main()
