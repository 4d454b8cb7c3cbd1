line = fgetl(stdin);
n = str2double(line);
printf("%d\n", n * 2);
args = argv();
for i = 1:numel(args)
  printf("%s\n", args{i});
end
fprintf(stderr, "conformance-stderr\n");
exit(3);
