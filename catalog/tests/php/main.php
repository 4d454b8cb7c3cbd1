<?php
$n = (int) trim(fgets(STDIN));
echo $n * 2, "\n";
foreach (array_slice($argv, 1) as $a) {
    echo $a, "\n";
}
fwrite(STDERR, "conformance-stderr\n");
exit(3);
