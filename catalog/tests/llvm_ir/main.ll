; Reads a number from stdin, prints it doubled, then each argument, a line on stderr, and
; exits 3 (typed pointers: LLVM 14).
@fmt_in = private constant [3 x i8] c"%d\00"
@fmt_out = private constant [4 x i8] c"%d\0A\00"
@err = private constant [20 x i8] c"conformance-stderr\0A\00"
@mode = private constant [2 x i8] c"w\00"

declare i32 @scanf(i8*, ...)
declare i32 @printf(i8*, ...)
declare i32 @puts(i8*)
declare i32 @fputs(i8*, i8*)
declare i8* @fdopen(i32, i8*)
declare i32 @fflush(i8*)

define i32 @main(i32 %argc, i8** %argv) {
entry:
  %n = alloca i32
  %fin = getelementptr [3 x i8], [3 x i8]* @fmt_in, i32 0, i32 0
  call i32 (i8*, ...) @scanf(i8* %fin, i32* %n)
  %v = load i32, i32* %n
  %d = mul i32 %v, 2
  %fout = getelementptr [4 x i8], [4 x i8]* @fmt_out, i32 0, i32 0
  call i32 (i8*, ...) @printf(i8* %fout, i32 %d)
  br label %loop
loop:
  %i = phi i32 [1, %entry], [%next, %body]
  %more = icmp slt i32 %i, %argc
  br i1 %more, label %body, label %done
body:
  %p = getelementptr i8*, i8** %argv, i32 %i
  %s = load i8*, i8** %p
  call i32 @puts(i8* %s)
  %next = add i32 %i, 1
  br label %loop
done:
  call i32 @fflush(i8* null)
  %m = getelementptr [2 x i8], [2 x i8]* @mode, i32 0, i32 0
  %e = call i8* @fdopen(i32 2, i8* %m)
  %msg = getelementptr [20 x i8], [20 x i8]* @err, i32 0, i32 0
  call i32 @fputs(i8* %msg, i8* %e)
  call i32 @fflush(i8* %e)
  ret i32 3
}
