"""The `tia2` command, the top of the house: it calls the stages (tasks/) and the benchmark flow
(flows/). `cli.main` assembles the commands; each module of a group of commands (data, images,
metrics, sql, finetuning, benchmark) defines each command's arguments beside what it runs."""
