from joycap_queue.cli import main

main()
