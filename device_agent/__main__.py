from device_agent._cli import main

main()
