from mergesafe.cli import main

main()
