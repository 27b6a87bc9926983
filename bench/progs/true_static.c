/* true_static: the exec target of the load generators. Built with -static so that
 * an exec costs only the kernel's work, not the dynamic loader's. */
int main(void)
{
	return 0;
}
