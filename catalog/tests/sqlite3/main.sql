-- stdin through cat: the shell's own readfile() cannot read a pipe.
CREATE TABLE input(line TEXT);
.import --csv "|cat" input
SELECT CAST(line AS INTEGER) * 2 FROM input LIMIT 1;
.output stderr
.print conformance-stderr
.output stdout
.exit 3
